import torch

# The core tests run tiny tensors (8x8 latents, batch <= 5) for which threading buys nothing; on a busy 2-core
# machine OpenMP's worker threads spin against other processes and make a 50 ms UNet call take seconds.
torch.set_num_threads(1)
