"""The published contract (docs/asyncapi.json, `runledger asyncapi`) names every command and
query the running service answers: a client built from it misses none."""

from runledger.handlers.contract import asyncapi_document


async def test_every_query_and_command_the_service_answers_is_in_the_contract(service):
    operations = asyncapi_document()["operations"]
    answered = set(service.queries.specs) | set(service.commands.specs)
    assert sorted(answered - set(operations)) == []
