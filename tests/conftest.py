"""Test setup: without CUDA, Triton kernels run on CPU tensors through the interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence here, at collection start.

A shell that starts pytest in the background (``cmd &`` without job control, ``nohup``) leaves SIGINT ignored,
and an ignored SIGINT is inherited by every process the tests start: the Ctrl-C tests need Python's own handler
(an exec resets a handled signal to its default, which Python turns into KeyboardInterrupt).
"""

import os
import signal

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
