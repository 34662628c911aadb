from bazaar.cli import main

if __name__ == "__main__":  # not when a spawned child process (the model worker) imports it
    main()
