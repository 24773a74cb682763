"""The Gradio playground for curators and admins: review feedback into training examples, curate the
dataset, chat with and compare adapters, and (admins) retrain, promote and roll back.

    from playground import PlaygroundConfig, build_playground, launch
    config = PlaygroundConfig.from_settings(settings)
    launch(build_playground(config=config, engine=engine, db_path=settings.db_path, home=settings.kbloop_home),
           config=config)

The decisions live in plain functions (playground.review, .dataset, .chat, .training) that take a
database connection and a Viewer; each tab's `*_tab.py` lays them out, and app.py assembles the tabs.
"""

from playground.auth import AdminRequired, Viewer, viewer_for
from playground.config import PlaygroundConfig, PlaygroundError, check_bind, is_loopback

_GRADIO_APP = ("build_playground", "launch", "mount_playground")


def __getattr__(name: str):
    # Gradio takes seconds to import: only the names that build the app load it (PEP 562), so that the
    # command line and the handler modules start without it.
    if name in _GRADIO_APP:
        from playground import app

        return getattr(app, name)
    raise AttributeError(f"module 'playground' has no attribute {name!r}")

__all__ = [
    "AdminRequired", "PlaygroundConfig", "PlaygroundError", "Viewer", "build_playground", "check_bind",
    "is_loopback", "launch", "mount_playground", "viewer_for",
]
