"""Entry-point wrapper: user errors as one line and exit status 2, bugs with their traceback.

  python -m emorl_jax.train ...            # error: /data/MELD: meld corpus folder not found   (exit 2)
  python -m emorl_jax.train ... --verbose  # the same error with its traceback (EMORL_VERBOSE=1 does the same)
  python -m emorl_jax.train --config=tiny_synthetic ...   # a bundled config by name, or any configs/*.py path
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from emorl_jax.config import config_path
from emorl_jax.errors import find_user_error

flags.DEFINE_bool("verbose", False, "show tracebacks of user errors too (or set EMORL_VERBOSE=1)")

USER_ERROR_EXIT = 2


def verbose() -> bool:
    return flags.FLAGS.is_parsed() and flags.FLAGS.verbose or os.environ.get("EMORL_VERBOSE", "") not in ("", "0")


def run(main) -> None:
    """`absl.app.run(main)` with absl logging at WARNING; a user error (`emorl_jax.errors.UserError`, also when it
    caused the exception that reached the top) is printed as `error: <what>: <problem>` on stderr, exit status 2."""

    def guarded(argv):
        logging.set_verbosity(logging.WARNING)  # orbax logs every save and restore at INFO
        try:
            return main(argv)
        except Exception as exc:  # noqa: BLE001 - re-raised unless it is a user error
            _exit_on_user_error(exc)
            raise

    try:  # --config=tiny_synthetic names a bundled config (emorl_jax.configs): an installed package needs no checkout
        sys.argv = [f"--config={config_path(arg.split('=', 1)[1])}" if arg.startswith("--config=") else arg
                    for arg in sys.argv]
    except Exception as exc:  # noqa: BLE001
        _exit_on_user_error(exc)
        raise
    app.run(guarded)


def _exit_on_user_error(exc: BaseException) -> None:
    """Prints `error: <message>` and exits with status 2 if `exc` is (or was caused by) a user error."""
    user = find_user_error(exc)
    if user is not None and not verbose():
        print(f"error: {user}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT)
