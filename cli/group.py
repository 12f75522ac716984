"""The `tiersim` group: every command's tiersim errors become one line that names the flag at fault."""

from __future__ import annotations

import re

import click

from tiersim.errors import ConfigError, TiersimError
from tiersim.version import __version__

# A library message that starts with a field name ("gen_tokens must be ...", "batches: 0 is ...") names that field.
_LEADING_FIELD = re.compile(r"^([a-z][a-z0-9_]*)(?= must be|:)")


def flag_for(command: click.Command, field: str) -> str | None:
    """The flag of `command` that sets config field `field` (its parameter name, or an alias spelling it)."""
    spelled = "--" + field.replace("_", "-")
    for param in command.params:
        if isinstance(param, click.Option) and (param.name == field or spelled in param.opts + param.secondary_opts):
            return param.opts[0].split("/")[0]
    return None


def one_line(command: click.Command | None, e: TiersimError) -> str:
    """The error as the CLI prints it: prefixed with the flag when the library named only the field."""
    message = " ".join(str(e).split())
    field = e.field if isinstance(e, ConfigError) else None
    if field is None and (m := _LEADING_FIELD.match(message)):
        field = m.group(1)
    flag = flag_for(command, field) if command is not None and field else None
    if flag is None or re.search(re.escape(flag) + r"\b", message):
        return message
    if message.startswith(field + ":"):
        return flag + message[len(field):]
    # The field name stays in the text: scripts and tests match on it (e.g. "hbm_ratio must be ...").
    return f"{flag}: {message}"


class Command(click.Command):
    """A command whose TiersimErrors, raised while parsing (path checks) or running, print as one line."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except TiersimError as e:
            raise click.ClickException(one_line(self, e)) from None

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except TiersimError as e:
            raise click.ClickException(one_line(self, e)) from None


class Group(click.Group):
    """A click group whose commands are `Command`s, and whose own errors print as one line too."""

    command_class = Command

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except TiersimError as e:
            raise click.ClickException(one_line(None, e)) from None


Group.group_class = Group


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="tiersim")
def cli() -> None:
    """Simulate and validate a tiered (HBM / DDR / compressed / evicted) KV cache for reasoning LLMs."""


def main() -> None:
    """Console-script entry point."""
    cli()
