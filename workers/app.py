"""The Celery app: ``celery -A workers worker -Q llm.groq,llm.gemini -P threads``."""

from celery import Celery

app = Celery("spillway")
app.config_from_object("celeryconfig")
