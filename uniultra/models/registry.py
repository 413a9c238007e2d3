"""Re-export of the torch-free registry, which lives in `uniultra.registry` so that the Slicer
modules can import it without importing torch (`uniultra.models` imports torch)."""

from uniultra.registry import (  # noqa: F401
    REPO_ROOT,
    ModelEntry,
    clear_downloads,
    downloads_dir,
    get_entry,
    load_registry,
    register_user_model,
    registered_dir,
    resources_dir,
    user_models_dir,
)
