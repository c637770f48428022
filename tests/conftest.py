import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster than two fighting over a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_script(script, *args, torchrun=False, port=29517, check=True):
    """Run one of the repo's scripts as a user would (or under a 2-process torchrun), from the repo
    root; fail the test with the script's stderr if it did not exit 0 (and check is set)."""
    cmd = [sys.executable, *(['-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={port}'] if torchrun else []),
           script, *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r
