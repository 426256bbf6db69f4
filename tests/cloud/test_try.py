from tests.cloud.conftest import Emulator
from tests.conftest import Cli


def test_try(cli: Cli, emulator: Emulator) -> None:
    env = emulator.env()
    for args in (
        ["build"],
        ["build"],
        ["upload"],
        ["upload"],
        ["deploy", "--gpu", "a100"],
        ["deploy", "--gpu", "a100"],
        ["predict", "a fox", "-o", "fox.png", "--steps", "2", "--width", "64", "--height", "64"],
        ["status"],
        ["teardown", "--yes"],
    ):
        r = cli(*args, env=env)
        print(args, r.code, r.out, r.err[-3000:])
        assert r.code == 0
    print(emulator.labelled())
