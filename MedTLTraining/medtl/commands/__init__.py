"""One module per ``medtl`` command: ``add_parser(subparsers)`` registers its arguments and
``run(args) -> int`` carries it out. :data:`COMMANDS` is their order in ``medtl --help``."""

from medtl.commands import (
    adapt,
    cv,
    demo,
    device,
    drift,
    ensemble,
    evaluate,
    explain,
    export,
    info,
    keygen,
    models,
    predict,
    sign,
    train,
    verify,
    weights,
)

COMMANDS = [
    demo,
    train,
    predict,
    drift,
    ensemble,
    explain,
    adapt,
    evaluate,
    cv,
    export,
    device,
    info,
    keygen,
    sign,
    verify,
    models,
    weights,
]
