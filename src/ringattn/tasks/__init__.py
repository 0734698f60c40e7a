"""Training tasks: one class per file, found by name.

    from ringattn import tasks
    cls = tasks.get("needle")           # the class: defaults, help, model facts (cls.info())
    task = cls(args)                    # one run's task: batches and the held-out set

Every module of this package is imported once, on the first lookup; a module that defines a
task subclass decorated with @register adds it. A task defined elsewhere (a test, a user's
script) registers the same way before the command line is built. The trainer only ever goes
through this registry, so adding a task is one new file (see tasks/task.py for what a task is).
"""
import importlib
import pkgutil

from .task import Task, register, registered

__all__ = ["Task", "register", "get", "names"]


def _load_package():
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")


def names():
    """Registered task names, in their listing order (Task.order, then name)."""
    _load_package()
    return tuple(sorted(registered(), key=lambda n: (registered()[n].order, n)))


def get(name):
    """The task class called `name`; ValueError listing the known ones otherwise."""
    known = names()
    if name not in known:
        raise ValueError(f"unknown task {name!r}: expected one of {', '.join(known)}")
    return registered()[name]
