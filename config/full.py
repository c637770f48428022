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
dec_patch_size = 16
dec_dim = 768
dec_depth = 12
dec_n_head = 12
text_dim = 512
text_depth = 4
batch_size = 32
learning_rate = 3e-4
max_iters = 100000
warmup_iters = 2000
eval_interval = 2000
