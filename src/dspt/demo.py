"""`dspt demo` (written next)."""
import argparse


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    pass
