from bootenv.cli import run

run()
