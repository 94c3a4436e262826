"""Label Studio integration: label config parsing, per-project state in MODEL_DIR, jobs, pipelines.

Used by ``backend/`` (the HTTP adapter) and the ``molal serve|sync|train|query|jobs|worker`` commands.
``molal.lsprocess`` (outside this package) starts a real headless Label Studio for the tests and the demo.
"""
