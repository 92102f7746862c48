"""One module per `lmserve` subcommand, each with add_parser(subparsers) and run(args) -> exit code."""
