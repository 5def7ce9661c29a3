"""The commands: one module per script at the project's root (train.py is cli/train.py), each
get_args_parser() and main(args) over the library, and run() for the console command."""
