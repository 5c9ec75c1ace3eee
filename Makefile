# The first two targets are the README's two commands: `make run` and `make test`.
PYTHON3 ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: run test install worker beat lint check-deploy bench clean

run: install  ## start the console on SQLite with demo data, tasks in-process
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py ops demo
	$(BIN)/python manage.py runserver 127.0.0.1:8000

test: install  ## the whole test suite (needs PostgreSQL and Redis on 127.0.0.1)
	$(BIN)/pytest

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON3) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

worker: install  ## a Celery worker (set REDIS_URL, and DATABASE_URL to the console's database)
	$(BIN)/celery -A opsconsole worker --loglevel INFO

beat: install  ## Celery beat: runs the sweeper every OPERATION_SWEEP_INTERVAL s (same settings)
	$(BIN)/celery -A opsconsole beat --loglevel INFO

lint: install
	$(BIN)/ruff check .

check-deploy: install  ## Django's deployment checks under production settings
	DJANGO_SETTINGS_MODULE=opsconsole.settings_production \
	SECRET_KEY=$$($(BIN)/python -c "import secrets; print(secrets.token_urlsafe(64))") \
	ALLOWED_HOSTS=console.example.com \
	TARGET_SECRET_KEY=$$($(BIN)/python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())") \
	AUDIT_CHAIN_KEY=$$($(BIN)/python -c "import secrets; print(secrets.token_urlsafe(48))") \
	$(BIN)/python manage.py check --deploy --fail-level WARNING

bench: install  ## benchmarks under bench/ (need PostgreSQL and Redis)
	$(BIN)/python bench/force_unlock.py
	$(BIN)/python bench/rollback_overhead.py
	$(BIN)/python bench/admin_scale.py
	$(BIN)/python bench/status_api.py

clean:
	rm -rf $(VENV) data staticfiles
