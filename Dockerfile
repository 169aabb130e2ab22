FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY commands commands
COPY handlers handlers
COPY projections projections
COPY infra infra
COPY client client
COPY cli cli
RUN pip install --no-cache-dir . && useradd --create-home runledger
USER runledger
ENV RUNLEDGER_NATS_URL=nats://nats:4222 \
    RUNLEDGER_DATABASE_URL=postgresql://runledger:runledger@postgres:5432/runledger
ENTRYPOINT ["runledger"]
CMD ["serve"]
