from murmur.cli import main

raise SystemExit(main())
