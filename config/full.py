# Paper-like shapes for a multi-GPU node: 384 px, a ViT-B/16 encoder (576 patches), up to 64 concept
# tokens, and (in train_setokim.py) an LLM of GPT-2-medium size. Point data_dir at a real dataset.
out_dir = 'out/full'
image_size = 384
# SeTok
patch_size = 16
dim = 768
depth = 12
n_head = 12
token_dim = 1024
intra_depth = 2
inter_depth = 2
max_tokens = 64
dec_sprite_size = 32          # a 384 px image drawn from up to 64 sprites of 32 x 32 cells
dec_dim = 1024
text_dim = 768
text_depth = 4
batch_size = 32
learning_rate = 3e-4
max_iters = 100000
warmup_iters = 2000
eval_interval = 2000
# SETOKIM (train_setokim.py): GPT-2-medium shapes (24 layers, 1024 wide, 16 heads)
llm_n_layer = 24
llm_n_head = 16
llm_n_embd = 1024
block_size = 1280             # tokenizer=patch: 576 tokens per 384px image, two in an edit
mask_dim = 256
mask_depth = 2
mask_n_head = 8
llm_batch_size = 32
llm_learning_rate = 3e-4
llm_warmup_iters = 2000
stage1_max_iters = 20000
stage2_max_iters = 60000
llm_eval_interval = 5000
eval_per_task = 500
