"""The `rqlab` command line.

    rqlab data fetch fashion-mnist [--data-root DIR]
    rqlab data info cifar10

Each subcommand is a function `cmd_<name>(args) -> int` plus a function that adds its
parser and sets `run=cmd_<name>` as a default; to add one, write both and list the parser
function in SUBCOMMANDS. Errors of type RqlabError are printed as `rqlab: error: <message>`
(exit code 2), without a traceback; Ctrl-C and SIGTERM end a command with one line (exit
code 130; `rqlab train` says which checkpoint is kept); any other exception prints one
line and the path of a log holding its traceback (exit code 1; logs in $RQLAB_LOG_DIR,
else ~/.cache/rqlab/logs). Warnings print as one line, without a source line. Heavy
modules (torch) are imported inside the commands, so `rqlab --help` is fast.
"""
from __future__ import annotations

import argparse
import datetime
import os
import signal
import sys
import threading
import traceback
import warnings
from pathlib import Path

from rqlab import __version__
from rqlab.cli import bitselect as bitselect_cmd, deploy as deploy_cmd, eval as eval_cmd, report as report_cmd, train as train_cmd, zoo as zoo_cmd
from rqlab.validate import RqlabError


def cmd_data_fetch(args) -> int:
    from rqlab import data

    where = data.fetch(args.name, root=args.root)
    print(f"{args.name}: ready at {where}")
    return 0


def cmd_data_info(args) -> int:
    from rqlab import data

    info = data.dataset_info(args.name)
    print(f"{info.name} (torchvision.datasets.{info.torchvision_class})")
    print(f"  input shape  {info.input_shape} (C, H, W), {info.num_classes} classes")
    for split, size in info.sizes.items():
        print(f"  {split:<12} {size} examples")
    print(f"  mean         {info.mean}")
    print(f"  std          {info.std}")
    print(f"  classes      {', '.join(info.classes)}")
    print(f"  stored at    {info.path(data.data_root(args.root))}")
    return 0


def add_data_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="fetch datasets and show their metadata")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, run, help_text in (
        ("fetch", cmd_data_fetch, "make a dataset available offline (both splits)"),
        ("info", cmd_data_info, "print sizes, shape, mean/std and classes"),
    ):
        a = actions.add_parser(action, help=help_text)
        a.add_argument("name", metavar="NAME", help="dataset, e.g. fashion-mnist or cifar10")
        a.add_argument("--data-root", "--root", dest="root", metavar="DIR", default=None,
                       help="data root (default: $RQLAB_DATA, else ~/.cache/rqlab/data)")
        a.set_defaults(run=run)


# One function per subcommand: it adds the subcommand's parser and sets `run`.
SUBCOMMANDS = [add_data_parser, train_cmd.add_cli, eval_cmd.add_cli, bitselect_cmd.add_cli, report_cmd.add_cli,
               zoo_cmd.add_cli, deploy_cmd.add_cli]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rqlab", description="Adversarial robustness of quantized neural networks.")
    parser.add_argument("--version", action="version", version=f"rqlab {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line with `argv` (default sys.argv[1:]); return the exit code."""
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # for `--nproc N`, which relaunches it
    except SystemExit as exit_:  # --help, --version, usage errors: argparse has printed
        return int(exit_.code or 0)
    with _terminate_as_interrupt(), warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return args.run(args)
        except RqlabError as err:
            print(f"rqlab: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("rqlab: interrupted; files written so far are complete (rqlab writes atomically)",
                  file=sys.stderr)
            return 130
        except Exception:  # a bug, not bad input: one line here, the traceback in a log
            log = _write_log(argv if argv is not None else sys.argv[1:])
            kind, value = sys.exc_info()[:2]
            line = (str(value).splitlines() or [""])[0][:300]
            print(f"rqlab: unexpected error: {kind.__name__}: {line} (traceback in {log}; please report it)",
                  file=sys.stderr)
            return 1


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line (`rqlab: warning: ...`), without the Python source line."""
    print(f"rqlab: warning: {message}", file=file or sys.stderr)


class _terminate_as_interrupt:
    """SIGTERM raises KeyboardInterrupt while a command runs (main thread only), so a
    killed `rqlab train` or `rqlab report` ends like Ctrl-C: one line, complete files."""

    def __enter__(self):
        self.old = None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGTERM, _raise_interrupt)
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)
        return False


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _write_log(argv) -> Path | str:
    """Write the current exception's traceback to a new log file; return its path."""
    folder = Path(os.environ.get("RQLAB_LOG_DIR") or Path("~/.cache/rqlab/logs").expanduser())
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    text = f"rqlab {__version__}: rqlab {' '.join(map(str, argv))}\n\n{traceback.format_exc()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"rqlab-{stamp}-{os.getpid()}.log"
        path.write_text(text)
        return path
    except OSError:  # nowhere to write: the traceback goes to stderr after all
        print(text, file=sys.stderr)
        return "the lines above"


if __name__ == "__main__":
    sys.exit(main())
