"""Placeholder until this area's commands land."""


def register(app):
    pass
