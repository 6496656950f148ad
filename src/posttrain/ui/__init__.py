"""The web studio (`posttrain ui`): runs, launch, chat and data pages over a root directory.

runs.py reads run directories, forms.py turns a stage's pydantic config into form fields and
back, jobs.py starts the project's own verbs as subprocesses (training runs, pipelines, chat
servers), app.py is the FastAPI app with its security checks, static/ the page (plain JS).
"""
