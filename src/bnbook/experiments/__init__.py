"""One module per chapter: its typed config (the papermill parameters) and its experiment.

Each module defines a :class:`bnbook.config.ChapterConfig` subclass and a
``run(config, device) -> bnbook.results.Outcome`` function that the chapter passes to
:func:`bnbook.results.cached`.
"""
