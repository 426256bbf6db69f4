"""The app's command group: help text shown as written, flags without a value type, global options anywhere."""

from __future__ import annotations

from typing import Any

import typer.core

# The global options a user may also give after the subcommand (`sdxlctl status --debug`), as gcloud's
# --project or --verbosity go anywhere on its command line; each with whether it takes a value.
ANYWHERE = {"--config": True, "-c": True, "--debug": False}


# `sdxlctl -h` lists the commands in the order a deployment lives, as `sdxlctl init` to `teardown` would run;
# a command not named here comes last.
LIFECYCLE = [
    "init", "check", "build", "upload", "deploy", "predict", "batch", "lora", "ui-deploy",
    "status", "logs", "cost", "teardown", "config", "styles",
]  # fmt: skip


class Group(typer.core.TyperGroup):
    """Typer's group, with every command's help made plain and the global options accepted after it."""

    def list_commands(self, ctx: Any) -> list[str]:
        rank = {name: i for i, name in enumerate(LIFECYCLE)}
        return sorted(super().list_commands(ctx), key=lambda name: rank.get(name, len(rank)))

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            plain_help(command, ctx)
        return command

    def format_help(self, ctx: Any, formatter: Any) -> None:
        plain_help(self, ctx)
        super().format_help(ctx, formatter)

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, self.hoisted(ctx, args))

    def hoisted(self, ctx: Any, args: list[str]) -> list[str]:
        """`args` with the global options given after the subcommand moved before it.

        The subcommand's own options keep their values (`predict -o --debug` writes a file named --debug),
        an option of the same name that a subcommand defines itself stays its own, and `--` ends the search.
        """
        start = self._subcommand_at(ctx, args)
        if start is None:
            return args
        command = self.get_command(ctx, args[start])
        end = start + 1
        if isinstance(command, Group):  # `sdxlctl lora push FILE --debug`: the options of push are its own
            between: list[str] = []
            at = end
            while at < len(args) and args[at].split("=", 1)[0] in ANYWHERE:  # `lora --debug push`
                taken = 2 if ANYWHERE[args[at].split("=", 1)[0]] and "=" not in args[at] else 1
                between, at = between + args[at : at + taken], at + taken
            if at >= len(args) or args[at].startswith("-"):
                return args
            args, start = [*args[:start], *between, args[start], *args[at:]], start + len(between)
            command, end = command.get_command(ctx, args[start + 1]), start + 2
        if command is None or isinstance(command, typer.core.TyperGroup):
            return args
        own_valued, own = set(), set()
        for param in command.get_params(ctx):
            names = [*getattr(param, "opts", []), *getattr(param, "secondary_opts", [])]
            own.update(names)
            if getattr(param, "param_type_name", "") == "option" and not getattr(param, "is_flag", False):
                own_valued.update(names)
        moved: list[str] = []
        rest: list[str] = []
        tail = args[end:]
        at = 0
        while at < len(tail):
            token = tail[at]
            if token == "--":
                rest += tail[at:]
                break
            name = token.split("=", 1)[0] if token.startswith("--") else token
            valued = "=" not in token and at + 1 < len(tail)
            if name in ANYWHERE and name not in own:
                taken = 2 if ANYWHERE[name] and valued else 1
                moved += tail[at : at + taken]
            else:
                taken = 2 if name in own_valued and valued else 1
                rest += tail[at : at + taken]
            at += taken
        return [*args[:start], *moved, *args[start:end], *rest]

    def _subcommand_at(self, ctx: Any, args: list[str]) -> int | None:
        """Where the subcommand's name is in `args`, past the group's own options and their values."""
        valued = {
            name
            for param in self.get_params(ctx)
            if getattr(param, "param_type_name", "") == "option" and not getattr(param, "is_flag", False)
            for name in param.opts
        }
        at = 0
        while at < len(args):
            token = args[at]
            if token == "--":
                return None
            if not token.startswith("-"):
                return at
            at += 2 if token in valued else 1
        return None


def plain_help(command: Any, ctx: Any) -> None:
    """Show each help text as written, and flags as taking no value.

    Help texts name config keys as `[deploy] gpu`, which rich markup would take for a style and drop; and
    typer shows `<bool>` beside a flag as if it wanted a value.
    """
    from rich.markup import escape

    if getattr(command, "_sdxlctl_plain", False):  # escaping twice would show the backslashes
        return
    command._sdxlctl_plain = True
    for attribute in ("help", "short_help", "epilog"):
        text = getattr(command, attribute, None)
        if text:
            setattr(command, attribute, escape(text))
    for param in command.get_params(ctx):
        if getattr(param, "help", None):
            param.help = escape(param.help)
        if getattr(param, "is_flag", False):
            param.metavar = ""
