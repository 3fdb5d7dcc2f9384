"""Shell completion is Typer's own (`--install-completion`, `--show-completion`, and the
`_DELAYQ_COMPLETE` variable its scripts set); this adds the two things it lacks:

- a shell named after the flag (`delayq --show-completion zsh`): Typer's flags take no
  value and use the shell they detect among the parent processes, so `zsh` would be
  ignored (a bash user would get the bash script) or, where no shell is found (a
  Dockerfile's `RUN`, a package build), the script would not be printed at all;
- Click 8's spelling of the variable (`_DELAYQ_COMPLETE=bash_source delayq`, as Click's
  documentation shows it), which Typer reads as `source_bash`."""

from __future__ import annotations

import os

PROG = "delayq"
COMPLETE_VAR = "_DELAYQ_COMPLETE"
SHELLS = ("bash", "zsh", "fish", "powershell", "pwsh")
_FLAGS = ("--show-completion", "--install-completion")


def explicit_shell(args: list[str]) -> bool:
    """Handle `delayq --show-completion SHELL` or `--install-completion SHELL`; True if
    `args` was one of them (anything else is left to Typer)."""
    if len(args) != 2 or args[0] not in _FLAGS or args[1] not in SHELLS:
        return False
    from typer._completion_shared import get_completion_script, install

    flag, shell = args
    if flag == "--show-completion":
        print(get_completion_script(prog_name=PROG, complete_var=COMPLETE_VAR, shell=shell))
    else:
        shell, path = install(shell=shell, prog_name=PROG, complete_var=COMPLETE_VAR)
        print(f"{shell} completion installed in {path}")
        print("Completion will take effect once you restart the terminal")
    return True


def accept_click_spelling() -> None:
    """`_DELAYQ_COMPLETE=bash_source` (Click 8) as Typer's `source_bash`."""
    shell, _, instruction = os.environ.get(COMPLETE_VAR, "").partition("_")
    if shell in SHELLS and instruction in ("source", "complete"):
        os.environ[COMPLETE_VAR] = f"{instruction}_{shell}"
