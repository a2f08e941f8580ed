"""`python -m specexec_app`: the `specexec` command."""

from specexec_app.ui.cli import main

main()
