from warmserve.cli import main

raise SystemExit(main())
