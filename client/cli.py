"""The ``deltaserve`` command line (click).

Commands live in one module per area and are attached here; heavy imports (torch,
vLLM) happen inside the command functions so that ``deltaserve --help`` is instant.
The README's CLI table is checked against :func:`command_table` by a test.
"""

from __future__ import annotations

import click

from deltaserve.client import cli_base, cli_data, cli_demo, cli_server, cli_tune


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="deltaserve")
def main() -> None:
    """deltaserve: one multimodal base model, many hot-swappable task deltas, on vLLM."""


main.add_command(cli_base.base)
for _cmd in (
    cli_server.serve,
    cli_server.register,
    cli_server.unregister,
    cli_server.list_cmd,
    cli_server.generate,
    cli_server.route,
    cli_server.metrics,
):
    main.add_command(_cmd)
main.add_command(cli_data.data)
main.add_command(cli_demo.demo)
for _cmd in (cli_tune.tune, cli_tune.eval_cmd, cli_tune.bench):
    main.add_command(_cmd)


def command_table(group: click.Group = main, prefix: str = "") -> dict[str, str]:
    """Every leaf command as ``"base build"`` → first line of its help."""
    table: dict[str, str] = {}
    for name, cmd in sorted(group.commands.items()):
        path = f"{prefix}{name}"
        if isinstance(cmd, click.Group):
            table.update(command_table(cmd, path + " "))
        else:
            table[path] = (cmd.help or "").strip().splitlines()[0]
    return table


if __name__ == "__main__":
    main()
