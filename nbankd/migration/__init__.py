"""Moving a registry's records to another registry (embedded -> django-neurobank).

- :mod:`.snapshot`: every datatype, archive, resource and location of a registry as
  frozen records, written to and read from an export file (JSON lines);
- :mod:`.plan`: the pure planner deciding, for each exported record, whether the
  target needs it created, has it already, or holds something that conflicts;
- :mod:`.execute`: reads the target's state for a snapshot and carries a plan out;
- :mod:`.switch`: pointing archives (``nbank.json``) and the configuration at the
  new registry, with backups;
- :mod:`.moves`: the record of registry moves that ``nbankctl history`` follows.
"""
