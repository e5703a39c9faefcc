from drseg_cli.cli import main

main()
