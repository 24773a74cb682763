"""The Gradio playground for curators and admins: review feedback into training examples, curate the
dataset, chat with and compare adapters, and (admins) retrain, promote and roll back.

    from playground import PlaygroundConfig, build_playground, launch
    config = PlaygroundConfig.from_settings(settings)
    launch(build_playground(config=config, engine=engine, db_path=settings.db_path, home=settings.kbloop_home),
           config=config)

The decisions live in plain functions (playground.review, .dataset, .chat, .training) that take a
database connection and a Viewer; app.py only lays them out.
"""

from playground.app import build_playground, launch, mount_playground
from playground.auth import AdminRequired, Viewer, viewer_for
from playground.config import PlaygroundConfig, PlaygroundError, check_bind, is_loopback

__all__ = [
    "AdminRequired", "PlaygroundConfig", "PlaygroundError", "Viewer", "build_playground", "check_bind",
    "is_loopback", "launch", "mount_playground", "viewer_for",
]
