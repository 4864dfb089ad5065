def pytest_collection_modifyitems(config, items):
    # Tests that stop the shared session stack must run after everything that uses it.
    items.sort(key=lambda item: item.get_closest_marker("stack_teardown") is not None)
