async def test_create_pool_then_read_it(broker):
    created = await broker.cmd("CreateWorkPool", name="smoke", type="process")
    assert created["ok"], created
    assert created["created"] is True
    assert created["result"]["status"] == "NOT_READY"
    pool = await broker.ok_qry("GetWorkPool", name="smoke")
    assert pool["id"] == created["result"]["id"]
    queues = await broker.ok_qry("ListWorkQueues", work_pool_name="smoke")
    assert [(q["name"], q["priority"]) for q in queues] == [("default", 1)]


async def test_a_list_of_servers_with_one_down_connects_to_one_that_is_up(settings):
    """A cluster's URLs with a node down: the CLI and the client (no waiting for a server to
    start) connect to another node instead of giving up at the first refusal."""
    from runledger.infra.embedded import free_port
    from runledger.infra.nats_connection import connect

    down = settings.model_copy(update={"nats_url": f"nats://127.0.0.1:{free_port()},{settings.nats_url}"})
    for _ in range(6):  # nats-py tries the servers in a random order: the one down first, often
        nc = await connect(down, wait_for_server=False)
        assert nc.is_connected
        await nc.close()
