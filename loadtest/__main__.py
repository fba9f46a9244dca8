"""`python -m loadtest SCENARIO`: see loadtest/README.md."""

from __future__ import annotations


def main() -> None:
    from loadtest.cli import main as run

    raise SystemExit(run())


if __name__ == "__main__":
    main()
