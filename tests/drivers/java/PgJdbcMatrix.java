// PgJDBC through the pooler in transaction mode: many threads of two apps at once, each
// with its own connection, running parameterised statements in autocommit (each lands on
// whichever server is free) and in short transactions, failed statements inside
// transactions, a batch insert and a rolled-back transaction.
//
// Run: java -cp /usr/share/java/postgresql.jar PgJdbcMatrix.java <prepareThreshold|default>
// Environment: DP_HOST, DP_PORT, DP_DBNAME, DP_APP{1,2}_{USER,PASSWORD,CLIENTS},
// optional DP_STATEMENTS (loop length, default 50). Exits 1 on any error or wrong result.
//
// Each app's schema holds kv(k, v = '<role>:<k>') for k in 1..100 and an empty
// items(run, client, n, note): see tests/tests/drivers.rs.

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.util.ArrayList;
import java.util.Collections;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.atomic.AtomicLong;

public class PgJdbcMatrix {
    static final int BATCH = 25;
    static final int TX_ROWS = 5;
    /** Loop rounds that also run {@link #failInTransaction}: early, and past the threshold. */
    static final java.util.Set<Integer> FAIL_AT = java.util.Set.of(1, 6, 25);

    static final List<String> failures = Collections.synchronizedList(new ArrayList<>());
    static final AtomicLong statements = new AtomicLong();

    static String env(String name) {
        String v = System.getenv(name);
        if (v == null || v.isEmpty()) {
            System.err.println("PgJdbcMatrix: environment variable " + name + " is not set");
            System.exit(2);
        }
        return v;
    }

    static void check(boolean ok, String what) {
        if (!ok) {
            throw new IllegalStateException(what);
        }
    }

    record App(String user, String password, int clients) {}

    public static void main(String[] args) throws Exception {
        String threshold = args.length > 0 ? args[0] : "default";
        String url = "jdbc:postgresql://" + env("DP_HOST") + ":" + env("DP_PORT") + "/" + env("DP_DBNAME");
        int loops = Integer.parseInt(System.getenv().getOrDefault("DP_STATEMENTS", "50"));
        String run = "pgjdbc-" + threshold + "-" + ProcessHandle.current().pid() + "-" + System.nanoTime();
        List<App> apps = new ArrayList<>();
        for (int i = 1; i <= 2; i++) {
            apps.add(new App(env("DP_APP" + i + "_USER"), env("DP_APP" + i + "_PASSWORD"),
                    Integer.parseInt(env("DP_APP" + i + "_CLIENTS"))));
        }

        List<Thread> threads = new ArrayList<>();
        for (App app : apps) {
            for (int c = 0; c < app.clients(); c++) {
                final int client = c;
                Thread t = new Thread(() -> {
                    try {
                        worker(url, threshold, app, client, run, loops);
                    } catch (Throwable e) {
                        failures.add(app.user() + " client " + client + ": " + e);
                    }
                });
                t.start();
                threads.add(t);
            }
        }
        for (Thread t : threads) {
            t.join();
        }
        String label = "pgjdbc " + org.postgresql.util.DriverInfo.DRIVER_VERSION + " prepareThreshold=" + threshold;
        if (!failures.isEmpty()) {
            System.err.println(label + ": " + failures.size() + " of " + threads.size() + " clients failed:");
            failures.forEach(f -> System.err.println("  " + f));
            System.exit(1);
        }
        System.out.println(label + ": ok, " + threads.size() + " clients of 2 roles, "
                + statements.get() + " statements");
    }

    static Connection connect(String url, String threshold, App app) throws SQLException {
        Properties props = new Properties();
        props.setProperty("user", app.user());
        props.setProperty("password", app.password());
        if (!threshold.equals("default")) {
            props.setProperty("prepareThreshold", threshold);
        }
        return DriverManager.getConnection(url, props);
    }

    static void worker(String url, String threshold, App app, int client, String run, int loops)
            throws SQLException {
        try (Connection conn = connect(url, threshold, app)) {
            // Autocommit: every statement is its own transaction, so with 2 servers for
            // many clients consecutive statements run on different servers.
            for (int n = 0; n < loops; n++) {
                int k = (client * 7 + n) % 100 + 1;
                // A new PreparedStatement each time, as JdbcTemplate does: PgJDBC's
                // statement cache still counts executions towards prepareThreshold.
                try (PreparedStatement ps = conn.prepareStatement("SELECT v FROM kv WHERE k = ?")) {
                    ps.setInt(1, k);
                    try (ResultSet rs = ps.executeQuery()) {
                        check(rs.next(), "kv row " + k + " missing");
                        String v = rs.getString(1);
                        check(v.equals(app.user() + ":" + k), "kv " + k + " = " + v);
                        check(!rs.next(), "kv " + k + ": more than one row");
                    }
                }
                try (PreparedStatement ps = conn.prepareStatement("SELECT ?::int * 2 + ?::int, current_user::text")) {
                    ps.setInt(1, client);
                    ps.setInt(2, n);
                    try (ResultSet rs = ps.executeQuery()) {
                        check(rs.next(), "arithmetic: no row");
                        check(rs.getInt(1) == client * 2 + n, "arithmetic: " + rs.getInt(1));
                        check(rs.getString(2).equals(app.user()), "current_user = " + rs.getString(2));
                    }
                }
                // A read-only transaction with a statement of the client's own.
                conn.setAutoCommit(false);
                check(ownStatement(conn, client) == 100 - client, "own statement");
                conn.commit();
                conn.setAutoCommit(true);
                statements.addAndGet(4);
                if (FAIL_AT.contains(n)) {
                    statements.addAndGet(failInTransaction(conn, client));
                }
            }

            String insert = "INSERT INTO items (run, client, n, note) VALUES (?, ?, ?, ?)";
            try (PreparedStatement ps = conn.prepareStatement(insert)) {
                for (int n = 0; n < BATCH; n++) {
                    ps.setString(1, run);
                    ps.setInt(2, client);
                    ps.setInt(3, n);
                    ps.setString(4, "batch");
                    ps.addBatch();
                }
                int[] counts = ps.executeBatch();
                check(counts.length == BATCH, "batch: " + counts.length + " counts");
                for (int c : counts) {
                    check(c == 1 || c == java.sql.Statement.SUCCESS_NO_INFO, "batch count " + c);
                }
                statements.addAndGet(BATCH);
            }

            conn.setAutoCommit(false);
            insertTx(conn, insert, run, client, "rollback");
            check(countNote(conn, run, client, "rollback") == TX_ROWS,
                    "own uncommitted rows not visible inside the transaction");
            conn.rollback();
            insertTx(conn, insert, run, client, "commit");
            conn.commit();
            conn.setAutoCommit(true);
            statements.addAndGet(2 * TX_ROWS + 1);

            Map<String, Integer> notes = new HashMap<>();
            try (PreparedStatement ps = conn.prepareStatement(
                    "SELECT note, count(*)::int FROM items WHERE run = ? AND client = ? GROUP BY note")) {
                ps.setString(1, run);
                ps.setInt(2, client);
                try (ResultSet rs = ps.executeQuery()) {
                    while (rs.next()) {
                        notes.put(rs.getString(1), rs.getInt(2));
                    }
                }
            }
            statements.incrementAndGet();
            Map<String, Integer> want = Map.of("batch", BATCH, "commit", TX_ROWS);
            check(notes.equals(want), "rows after commit/rollback: " + notes + ", want " + want);
        }
    }

    /**
     * Apps build some SQL with literals, so each client has statements of its own,
     * prepared only on the servers it happened to use.
     */
    static int ownStatement(Connection conn, int client) throws SQLException {
        try (PreparedStatement ps = conn.prepareStatement(
                "SELECT count(*)::int FROM kv WHERE k <= ? AND k > " + client)) {
            ps.setInt(1, 100);
            try (ResultSet rs = ps.executeQuery()) {
                check(rs.next(), "own statement: no row");
                return rs.getInt(1);
            }
        }
    }

    /**
     * A statement fails inside a transaction and the app, as apps do, runs another one
     * before rolling back: that one must fail as Postgres says (25P02), and the
     * connection must work as before afterwards.
     */
    static int failInTransaction(Connection conn, int client) throws SQLException {
        conn.setAutoCommit(false);
        try (PreparedStatement ps = conn.prepareStatement("SELECT 1 / ?::int")) {
            ps.setInt(1, 0);
            ps.executeQuery();
            check(false, "division by zero did not fail");
        } catch (SQLException e) {
            check("22012".equals(e.getSQLState()), "division by zero: " + e);
        }
        try {
            ownStatement(conn, client);
            check(false, "a statement in an aborted transaction did not fail");
        } catch (SQLException e) {
            check("25P02".equals(e.getSQLState()), "statement in an aborted transaction: " + e);
        }
        conn.rollback();
        conn.setAutoCommit(true);
        return 3;
    }

    static void insertTx(Connection conn, String insert, String run, int client, String note)
            throws SQLException {
        try (PreparedStatement ps = conn.prepareStatement(insert)) {
            for (int n = 0; n < TX_ROWS; n++) {
                ps.setString(1, run);
                ps.setInt(2, client);
                ps.setInt(3, n);
                ps.setString(4, note);
                check(ps.executeUpdate() == 1, "insert in transaction");
            }
        }
    }

    static int countNote(Connection conn, String run, int client, String note) throws SQLException {
        try (PreparedStatement ps = conn.prepareStatement(
                "SELECT count(*)::int FROM items WHERE run = ? AND client = ? AND note = ?")) {
            ps.setString(1, run);
            ps.setInt(2, client);
            ps.setString(3, note);
            try (ResultSet rs = ps.executeQuery()) {
                check(rs.next(), "count: no row");
                return rs.getInt(1);
            }
        }
    }
}
