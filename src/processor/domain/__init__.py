"""The race domain: pure rules from positions and a course to timing, results and alerts.

No I/O, no clock, no asyncio: time arrives as data. Modules, in reading order:

- ``model``: inputs (``Position``, ``Rules``, ``Course`` and its parts) and output rows;
- ``course_file`` / ``positions_csv``: the replay file formats;
- ``geometry``, ``fixes``, ``compiled``: planes, fix validity and spikes, the grid index;
- ``stage``: one entry on one stage (gates, waypoints, zones, penalties, result);
- ``anomalies``: safety alerts; ``ranking``: ranks, gaps, overall standings;
- ``track``: an entry's records kept ready for cheap in-order extension;
- ``engine``: ``evaluate`` (batch) and ``LiveEngine`` (incremental);
- ``output``: the replay JSON and the table for people.
"""
