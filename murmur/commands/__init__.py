"""One module per `murmur` subcommand. Each defines `register(subparsers)`, which adds its parser
and sets `func` to a callable taking the parsed args. Modules import heavy libraries inside `func`
so that `murmur --help` stays fast."""
