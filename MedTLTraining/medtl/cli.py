"""The ``medtl`` command.

    medtl demo [--out DIR] [--slices K] [--compare-scratch] [--device auto|cpu|cuda]
    medtl train CONFIG [--resume | --overwrite] [--predict IMG --predict-out SEG [--predict-uncertainty UNC]]
    torchrun --nproc_per_node N -m medtl train CONFIG [--resume]   (data-parallel, see medtl.distributed)
    medtl plan CONFIG [--budget-s S]             (how long and how much memory, from a few timed steps)
    medtl predict --model PKG --image IMG --out SEG [--probabilities PROB] [--uncertainty UNC] [--domain D]
    medtl adapt --model PKG (--data CSV | --image IMG ...) --out PKG2 [--domain D]
    medtl evaluate --model PKG --data CSV --out DIR [--group-by COL ...] [--bootstrap N]
    medtl cv CONFIG --folds K [--group-column COL] [--group-by COL ...] [--ensemble] [--resume]
    medtl explain --model PKG --image IMG --out CAM [--class N] [--layer NAME] [--domain D]
    medtl ensemble --model PKG --model PKG [...] --out ENS [--combine mean|vote] [--weight W ...]
    medtl drift --model PKG --data NEW.csv --out DIR [--reference TRAIN.csv] [--fail-on-drift]
    medtl export --model PKG --out DIR [--format onnx|torchscript ...] [--image IMG] [--domain D]
    medtl device [--device auto|cpu|cuda]
    medtl info PKG
    medtl keygen --out KEY                       (Ed25519: KEY and KEY.pub)
    medtl sign --model PKG --key KEY
    medtl verify --model PKG [--public-key KEY.pub]
    medtl models
    medtl weights seed [FILE ...] | check | download [ARCH ...]
    medtl serve [--requests DIR] [--idle-exit-s S] (the warm engine the Slicer module keeps: JSON lines in and out)

Progress goes to stderr as a bar; ``--events -`` sends the JSON-lines stream to stdout instead
(what the Slicer module reads), ``--events FILE`` appends it to a file.

Every failure is one line ``medtl: error: ...`` naming the file, field or CSV row, also written as
an ``error`` event into the run's ``events.jsonl``; the exit status is 2 for input to correct
(config, data, output paths) and 1 for a failure of the run (disk full, permission denied, out of
memory, a diverged training). ``--debug`` shows the traceback instead. Ctrl-C ends with
``medtl: interrupted`` (also an ``interrupted`` event) and status 130. A stop asked for through
``--stop-file`` (or ``$MEDTL_STOP_FILE``) emits ``cancelled`` and exits with status 3.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from medtl.commands import COMMANDS
from medtl.commands.sinks import CommandSinks
from medtl.errors import ConfigError, DataError, MedTLError, RunFailure
from medtl.stop import CANCELLED_EXIT_CODE, STOP_FILE_ENV, Cancelled


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medtl", description="Transfer learning for medical images.")
    parser.add_argument("--verbose", action="store_true", help="log details")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    args.sinks = CommandSinks(args)
    if getattr(args, "stop_file", None):
        os.environ[STOP_FILE_ENV] = args.stop_file
    # Read when torch loads its MPS backend, so before any torch import (see medtl.devices).
    os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
    try:
        return _dispatch(args)
    except Cancelled as err:
        print(f"medtl: {err}; the last checkpoint is kept (use --resume)", file=sys.stderr)
        args.sinks.record("cancelled", str(err))
        return CANCELLED_EXIT_CODE
    except KeyboardInterrupt:
        resumable = args.command in ("train", "cv")
        print(
            "\nmedtl: interrupted" + ("; the last checkpoint is kept (use --resume)" if resumable else ""),
            file=sys.stderr,
        )
        args.sinks.record("interrupted", "medtl: interrupted")
        return 130
    except Exception as err:
        if args.debug:
            raise
        error = user_error(err)
        print(f"medtl: error: {error}", file=sys.stderr)
        args.sinks.record("error", str(error))
        return error.exit_code
    finally:
        args.sinks.close()


def _dispatch(args: argparse.Namespace) -> int:
    from medtl.distributed import launched_by_torchrun

    if launched_by_torchrun() and args.command != "train":
        # N copies of any other command would each do the whole job and write the same files.
        raise ConfigError(f"only 'medtl train' runs under torchrun; run 'medtl {args.command}' as one process")
    return args.func(args)


def user_error(err: Exception) -> MedTLError:
    """Any exception as the one line the user reads: MedTL's own errors as they are; a full disk,
    a permission, memory and damaged files by their cause; anything else as an internal error."""
    if isinstance(err, MedTLError):
        return err
    first = (str(err).strip().splitlines() or [""])[0][:300]
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or "out of memory" in first.lower():
        return RunFailure(
            f"out of memory ({first or type(err).__name__}); lower train.batch_size or preprocessing.patch_size"
        )
    if isinstance(err, UnicodeDecodeError):  # a binary file given where text (CSV, JSON) belongs
        return DataError(f"a text file is not UTF-8 text ({first}); save it as UTF-8")
    if isinstance(err, OSError):
        where = f" {err.filename}" if err.filename else ""
        if err.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR):
            return DataError(f"{err.strerror}:{where}")
        if err.errno == errno.ENOSPC:
            return RunFailure(f"no space left on the device writing{where or ' a file'}")
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return RunFailure(f"{err.strerror}:{where}")
        return RunFailure(f"{err.strerror or first}:{where}")
    return RunFailure(f"internal error: {type(err).__name__}: {first} (run with --debug for the traceback)")


def run() -> int:
    """The process entry point (``medtl``, ``python -m medtl``): :func:`main`, then a quick exit.

    After the command, the objects that the torch and MONAI imports left behind are moved out of
    the garbage collector's reach: the collection at interpreter exit would spend more than a
    second on them (1.5 s against 0.3 s measured), which is the Slicer module's wait after every
    round. Everything is still finalised; only the final cycle search skips them.
    """
    import gc

    code = main()
    gc.freeze()
    return code
