"""modelkeep.store: the metadata database (schema, migrations, metadata store, captures)."""
