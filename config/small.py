# The CPU toy: 64x64 shapes world; SeTok and SETOKIM each train in well under an hour on a 2-core laptop.
# One preset describes one world for train_setok.py, train_setokim.py and sample.py; each script takes
# the keys it has and skips the others.
out_dir = 'out/small'
data_dir = 'data/shapes/world'
image_size = 64
# SeTok
patch_size = 4
dim = 64
depth = 3
n_head = 4
token_dim = 128
intra_depth = 1
inter_depth = 2
max_tokens = 16
cluster_k = 3
cluster_pos_weight = 0.25
cluster_layer = 1             # group on the features after the first block: they stay local and group by object (setok.py)
cluster_threshold = 0.5
cluster_merge = 0.6           # then touching clusters with a boundary this smooth are joined: one background, not 7 pieces
cluster_min_size = 3          # and a cluster of 1 to 3 patches (an edge, never an object) joins its closest neighbour
dec_sprite_size = 16
dec_dim = 256
grad_weight = 0.0             # no edge term: it slows the early steps, and the toy run is short
recon_weight = 100.0          # MSE is ~0.01 and the contrastive loss ~2: without the weight the encoder hardly learns to draw
warmup_iters = 50
learning_rate = 2e-3          # high for a short run: 2e-3 reconstructs better than 1e-3 in these 1500 steps
text_dim = 64
batch_size = 32
max_iters = 3000              # about 11 minutes on 2 cores; the edges sharpen late (RESULTS.md, section 14)
eval_interval = 1000
# SETOKIM (train_setokim.py): a 4-layer, 192-wide GPT; stage 1 + stage 2 in about 30 minutes on 2 cores
# (plus ~3 minutes, once, for SeTok's tokens of all 41k images and edit targets)
llm_n_layer = 4
llm_n_head = 4
llm_n_embd = 192
block_size = 640              # tokenizer=patch needs ~560 (256 tokens per image, two in an edit)
mask_dim = 128
mask_depth = 2
mask_n_head = 4
reg_weight = 0.3              # the visual regression's weight, below 1 so that its large loss leaves the reading tasks
                              # (VQA, captions, masks) their share of the shared, clipped gradient
llm_batch_size = 32
llm_learning_rate = 1e-3
llm_warmup_iters = 100
stage1_max_iters = 1000
stage2_max_iters = 9000        # long: VQA is learned late in stage 2; packed rows keep the steps cheap
llm_eval_interval = 3000        # an eval (about 50 s: it samples every written image) every 3000 steps and at the end of each stage
eval_per_task = 200
