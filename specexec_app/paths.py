"""Where the project's own data lies: presets, Spec-Bench prompts, shipped drafts; and where
it keeps what it makes (`cache_dir`)."""

import os
from pathlib import Path

import platformdirs

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
DRAFT_WEIGHTS = ROOT / "drafts" / "weights"


def cache_dir() -> Path:
    """What the app makes and keeps (GGUF conversions, the compiled fused steps): SPECEXEC_HOME,
    or the user's cache folder."""
    return Path(os.environ.get("SPECEXEC_HOME") or platformdirs.user_cache_dir("specexec"))
