"""What every command line shares: the parser, argument types and the ``error:`` line."""
import argparse
import sys

from .errors import UserError

DEVICES = ["auto", "cpu", "cuda", "mps"]


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` unless the help text already says what the default is."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``UserError``), defaults shown in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):  # no usage block: --help has it
        raise UserError(f"{message} (see python {self.prog} --help)")


def int_at_least(low):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def float_in(low, high, low_open=False, high_open=False):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if too_low or too_high:
            bounds = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be in {bounds}, got {value}")
        return value
    return parse


def lr_or_auto(text):
    """A learning rate, or ``auto`` for the range test's suggestion."""
    if text == "auto":
        return text
    try:
        return float_in(0, 10, low_open=True)(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (or auto)") from None


def given_flags(parser: argparse.ArgumentParser, argv) -> set:
    """The destinations of the options ``argv`` sets explicitly (defaults left out)."""
    unset = object()  # not a string: argparse would run a string default through the type
    defaults = vars(parser.parse_args([]))
    parser.set_defaults(**{dest: unset for dest in defaults})
    try:
        return {dest for dest, value in vars(parser.parse_args(argv)).items() if value is not unset}
    finally:
        parser.set_defaults(**defaults)


def option_names(parser: argparse.ArgumentParser) -> dict:
    """dest -> the option's long name as a user types it (``lr`` -> ``--max-lr``)."""
    return {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}


def run_command(command, argv=None) -> int:
    """``command(argv)``, with a ``UserError`` turned into the one ``error:`` line and exit status 2."""
    try:
        return command(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
