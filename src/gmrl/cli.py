"""The `gmrl` command. Each sub-command lives in its own module under `gmrl.commands`.

Modules are imported only when one of their commands runs (or its help is shown), so that
`gmrl --help` and `gmrl tabular` never load gymnax, flax or Ray, and no JAX backend starts before
a command has set the CPU device count (`gmrl.devices`). `LAZY_COMMANDS` lets `gmrl --help` list
a module's top-level commands without importing it; a module missing there is imported to list.
"""

from __future__ import annotations

import errno
import importlib
import os
import sqlite3
import sys
import threading

import click

from gmrl.errors import InputError

# Modules under gmrl.commands; each defines `register(cli: click.Group, study: click.Group)`.
COMMAND_MODULES: list[str] = ["tabular", "lola", "study", "mgrl", "mgrl_bias", "check"]

# Top-level command name -> (module that registers it, one-line help shown by `gmrl --help`).
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "tabular": ("tabular", "Exact vs decomposed meta-gradient estimates on tabular MDPs."),
    "lola": ("lola", "LOLA-DiCE on the iterated prisoner's dilemma, with the exact LOLA gradient."),
    "mgrl": ("mgrl", "Train A2C, MGRL or MGRL-LVC on a gymnax environment."),
    "mgrl-bias": ("mgrl_bias", "How biased is a saved MGRL run's meta-gradient? (large-batch and "
                               "DiCE references)"),
    "plot": ("study", "Redraw figures, results.csv and report.md from DIR/results.sqlite."),
    "check": ("check", "Check FILE.py:FUNCTION, a meta-gradient fn(task, rng) -> [S, A], against "
                       "the exact one."),
}
# `gmrl study NAME` -> module, for the names known without importing (the rest: every module).
LAZY_STUDIES: dict[str, str] = {"lola": "lola", "mgrl": "mgrl", "mgrl-tabular": "study"}

# Modules of the optional extras: a command that needs a missing one says which extra to install.
EXTRA_OF_MODULE = {"optax": "rl", "flax": "rl", "gymnax": "rl", "gymnasium": "rl", "six": "rl",
                   "tensorboardX": "rl", "ray": "ray"}
_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                errno.EISDIR, errno.EEXIST)

_loaded: set[str] = set()


def _load(module: str) -> None:
    if module not in _loaded:
        _loaded.add(module)
        importlib.import_module(f"gmrl.commands.{module}").register(cli, study)


def _load_all() -> None:
    for module in COMMAND_MODULES:
        _load(module)


class _LazyGroup(click.Group):
    """A group whose commands are registered by their module on first use."""

    def __init__(self, *args, lazy: dict[str, str] | None = None, listed: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._lazy = lazy or {}
        self._listed = listed  # whether list_commands may answer from `lazy` alone

    def get_command(self, ctx, name):
        if name not in self.commands:
            module = self._lazy.get(name)
            if module is not None and module in COMMAND_MODULES:
                _load(module)
            else:
                _load_all()
        return self.commands.get(name)

    def list_commands(self, ctx):
        if not self._listed:
            _load_all()
        else:  # modules that LAZY_COMMANDS does not describe are imported to list theirs
            for module in COMMAND_MODULES:
                if module not in {m for m, _ in LAZY_COMMANDS.values()}:
                    _load(module)
        return sorted(set(self.commands) | {n for n, m in self._lazy.items()
                                            if m in COMMAND_MODULES})

    def format_commands(self, ctx, formatter):
        if not self._listed:
            return super().format_commands(ctx, formatter)
        rows = []
        for name in self.list_commands(ctx):
            if name in self.commands:
                command = self.commands[name]
                if command.hidden:
                    continue
                rows.append((name, command.get_short_help_str(formatter.width - 6 - len(name))))
            elif name in LAZY_COMMANDS:
                rows.append((name, LAZY_COMMANDS[name][1]))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


class CommandInterrupted(Exception):
    """Ctrl-C (or a KeyboardInterrupt) inside a command, carried past click so that click prints
    nothing of its own; `main` prints the one line."""

    def __init__(self, interrupt: BaseException):
        super().__init__(str(interrupt))
        self.interrupt = interrupt


class _RootGroup(_LazyGroup):
    """The `gmrl` group: a KeyboardInterrupt inside a command leaves click as CommandInterrupted."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as err:
            raise CommandInterrupted(err) from err


@click.group(cls=_RootGroup, lazy={n: m for n, (m, _) in LAZY_COMMANDS.items()},
             listed=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gmrl")
def cli() -> None:
    """Estimate, diagnose and correct meta-gradients in gradient-based meta-RL."""


@cli.group(cls=_LazyGroup, lazy=LAZY_STUDIES)
def study() -> None:
    """Run one of the reference studies (writes a result store, figures and report.md)."""


def _interrupt_line(err: BaseException) -> str:
    """The one line for an interrupt: a final message in the chain, else the innermost one."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or err.__context__
    messages = [e for e in chain if isinstance(e, KeyboardInterrupt) and str(e).strip()]
    final = [e for e in messages if getattr(e, "final", False)]
    if final:
        return f"gmrl: {final[0]}"
    if messages:
        text = str(messages[-1])
        hint = "" if "re-run" in text or "resume" in text else "; re-run the same command to resume"
        return f"gmrl: {text}{hint}"
    return "gmrl: interrupted"


def _say(line: str) -> None:
    """Print `line` on stderr as one line, below any progress bar still drawn."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is not None:
        for bar in list(getattr(tqdm.tqdm, "_instances", ())):
            try:
                bar.close()
            except Exception:  # a bar that cannot close must not hide the message
                pass
    click.echo(" ".join(line.split()), err=True)


def _exit_interrupted(standalone: bool) -> None:
    """Exit 130 now. A command's worker threads (e.g. programs compiling in a thread pool) would
    hold a normal exit until they finish, minutes after Ctrl-C; the command's own cleanup has
    run by now, so the process ends at once (only as the `gmrl` program, never inside a caller)."""
    busy = [t for t in threading.enumerate()
            if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    if standalone and busy:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(130)


def _usage_line(err: click.UsageError) -> str:
    command = err.ctx.command_path if err.ctx is not None else "gmrl"
    return f"gmrl: error: {err.format_message()} (see '{command} --help')"


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input gives one line on stderr and exit status 2, never a traceback.

    Usage errors of click (a wrong type, an unknown or a missing option) are one line too; Ctrl-C
    is one line (what was kept, how to resume) and exit status 130.
    At start-up figures are drawn without a display (MPLBACKEND=Agg unless the caller chose a
    backend); library code never switches the matplotlib backend itself.
    """
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:
        cli.main(args=argv, prog_name="gmrl", standalone_mode=False)
    except InputError as err:
        _say(f"gmrl: error: {err}")
        sys.exit(2)
    except CommandInterrupted as err:
        _say(_interrupt_line(err.interrupt))
        _exit_interrupted(standalone=argv is None)
    except click.exceptions.Abort as err:
        _say(_interrupt_line(err.__context__) if err.__context__ else "gmrl: interrupted")
        _exit_interrupted(standalone=argv is None)
    except click.UsageError as err:
        _say(_usage_line(err))
        sys.exit(2)
    except click.ClickException as err:
        _say(f"gmrl: error: {err.format_message()}")
        sys.exit(err.exit_code)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
    except ModuleNotFoundError as err:
        extra = EXTRA_OF_MODULE.get((err.name or "").split(".")[0])
        if extra is None:
            raise
        _say(f"gmrl: error: this command needs the package {err.name!r} of the optional "
             f"extra gmrl[{extra}]; install it with: pip install 'gmrl[{extra}]'")
        sys.exit(2)
    except sqlite3.DatabaseError as err:
        _say(f"gmrl: error: a result store is damaged or unreadable ({err}); move its "
             "results.sqlite away (the figures and CSV beside it stay) or give another --out")
        sys.exit(2)
    except MemoryError:
        _say("gmrl: error: out of memory; give smaller sizes (fewer seeds, MDPs, repeats or "
             "episodes)")
        sys.exit(2)
    except OSError as err:
        if err.errno not in _DISK_ERRORS:
            raise
        where = f" {err.filename}" if err.filename else ""
        _say(f"gmrl: error: cannot write{where}: {err.strerror}; free space or give an "
             "output folder you can write to (completed files are left whole)")
        sys.exit(2)
