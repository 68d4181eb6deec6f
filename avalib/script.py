"""What every script's main() shares: the preamble, and one-line errors instead of tracebacks."""
from __future__ import annotations


from avalib import data, models


def run_script(main) -> None:
    """`if __name__ == "__main__"` of every script: bad data, an unloadable model or a missing file end
    in one line naming it, not a traceback."""
    import sys

    try:
        main()
    except (data.DataError, models.ModelLoadError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
