"""specexec-app: exact SpecExec speculative decoding for offloaded large language models."""

import logging

__version__ = "0.1.0"

# bitsandbytes' CPU backend tries to fetch a kernel from a model hub on import and warns when it
# cannot (we never reach for a hub): its own fallback is what runs, so the warning is noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# Its int8 matmul warns at every call that float32 inputs are cast (an int8 self-draft on a CPU:
# thousands of lines a reply); the cast is what we ask of it.
logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
