"""Tables, migrations, repository functions and the write-behind prediction writer."""
