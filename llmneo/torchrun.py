"""torchrun without torchrun's own traceback: ``python -m llmneo.torchrun ARGS`` = ``torchrun ARGS``.

When a trainer fails, torchrun raises ``ChildFailedError`` and prints its traceback and a table of
the failed ranks; on SIGTERM it raises ``SignalException`` with another traceback. The trainers have
already said why in one line (``error: …``, or the checkpoint they saved on SIGTERM), so here both
end quietly with the trainer's exit code (2: a user error, 128+N: stopped by signal N), which the
launcher (:func:`llmneo.steps.distill_student`) turns into the right hint.
"""

from __future__ import annotations

import logging
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def exit_code(error: ChildFailedError) -> int:
    """The first failed rank's exit code; a rank killed by signal N (torch reports -N) gives 128+N."""
    code = error.get_first_failure()[1].exitcode
    return 128 - code if code < 0 else (code or 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # "failed (exitcode: 2) local_rank: 0 ..." and the rendezvous' shutdown notes: the trainer said why
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as e:
        return exit_code(e)
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
