async def test_create_pool_then_read_it(broker):
    created = await broker.cmd("CreateWorkPool", name="smoke", type="process")
    assert created["ok"], created
    assert created["created"] is True
    assert created["result"]["status"] == "NOT_READY"
    pool = await broker.ok_qry("GetWorkPool", name="smoke")
    assert pool["id"] == created["result"]["id"]
    queues = await broker.ok_qry("ListWorkQueues", work_pool_name="smoke")
    assert [(q["name"], q["priority"]) for q in queues] == [("default", 1)]
