"""Test-session set-up that must happen before any test module imports a library.

Triton builds its own `tl.*` helpers in the mode active when triton is first imported (DeepSpeed and
others import it early), so the interpreter that runs our Triton kernels on CPU tensors is switched on
here, for the whole session. No other test runs Triton code, so nothing else notices.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"
