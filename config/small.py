# The CPU toy: 64x64 shapes world, trains SeTok in ~15 minutes and SETOKIM in ~30 on a 2-core laptop.
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
max_tokens = 12
dec_patch_size = 8
dec_dim = 128
dec_depth = 3
text_dim = 64
batch_size = 32
max_iters = 3000
eval_interval = 500
