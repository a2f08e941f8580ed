"""Where the project's own data lies: presets, Spec-Bench prompts, shipped drafts."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
DRAFT_WEIGHTS = ROOT / "drafts" / "weights"
