// PgJDBC LISTEN through the pooler's transaction port (PGConnection.getNotifications):
// DP_LISTENERS threads of app 1 LISTEN on a shared channel and on one of their own (some
// run short transactions between their notifications), DP_WORKERS threads of app 1 run
// transactions all along, DP_SENDERS threads of app 1 each send DP_NOTIFICATIONS numbered
// notifications on the shared channel and one on each listener's own channel; app 2
// listens on the same names and sends its own. Every app 1 listener must get each of its
// app's notifications exactly once, in order per sender, and nothing of app 2's; every
// app 2 listener exactly its app's. With DP_ISOLATED=0 (straight to Postgres, where
// every app hears every other) the other app's are skipped.
//
// Run: java -cp /usr/share/java/postgresql.jar PgJdbcListen.java
// Environment: DP_HOST, DP_PORT, DP_DBNAME, DP_APP{1,2}_{USER,PASSWORD}, optional
// DP_LISTENERS (50), DP_WORKERS (8), DP_SENDERS (2), DP_NOTIFICATIONS (100),
// DP_OTHER_LISTENERS (3), DP_ISOLATED (1). Exits 1 on any error or wrong result.

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.Collections;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicLong;

import org.postgresql.PGConnection;
import org.postgresql.PGNotification;

public class PgJdbcListen {
    static final String SHARED = "matrix_events";
    static final long DEADLINE_MS = 120_000;
    static final boolean ISOLATED = !"0".equals(System.getenv().getOrDefault("DP_ISOLATED", "1"));

    static final List<String> failures = Collections.synchronizedList(new ArrayList<>());
    static final AtomicBoolean sending = new AtomicBoolean(true);
    static final AtomicLong transactions = new AtomicLong();

    static String env(String name) {
        String v = System.getenv(name);
        if (v == null || v.isEmpty()) {
            System.err.println("PgJdbcListen: environment variable " + name + " is not set");
            System.exit(2);
        }
        return v;
    }

    static int envInt(String name, int fallback) {
        return Integer.parseInt(System.getenv().getOrDefault(name, Integer.toString(fallback)));
    }

    static void check(boolean ok, String what) {
        if (!ok) {
            throw new IllegalStateException(what);
        }
    }

    record App(String user, String password) {}

    static String url;

    static Connection connect(App app) throws Exception {
        Properties p = new Properties();
        p.setProperty("user", app.user());
        p.setProperty("password", app.password());
        return DriverManager.getConnection(url, p);
    }

    static void transaction(Connection c, App app, int k) throws Exception {
        c.setAutoCommit(false);
        try (PreparedStatement ps = c.prepareStatement("SELECT v FROM kv WHERE k = ?")) {
            ps.setInt(1, k);
            try (ResultSet rs = ps.executeQuery()) {
                check(rs.next(), "kv " + k + " missing");
                String v = rs.getString(1);
                check(v.equals(app.user() + ":" + k), "kv " + k + " = " + v);
            }
        }
        c.commit();
        c.setAutoCommit(true);
        transactions.incrementAndGet();
    }

    static final class Listener {
        final App app;
        final String own;
        final String direct;
        final boolean busy;
        final List<String[]> got = Collections.synchronizedList(new ArrayList<>());
        Connection conn;

        Listener(App app, String own, String direct, boolean busy) {
            this.app = app;
            this.own = own;
            this.direct = direct;
            this.busy = busy;
        }

        void open() throws Exception {
            conn = connect(app);
            try (Statement s = conn.createStatement()) {
                s.execute("LISTEN " + SHARED);
                s.execute("LISTEN \"" + own + "\"");
            }
        }

        /** Takes notifications in until told to stop, with transactions in between. */
        void pump() {
            try {
                PGConnection pg = conn.unwrap(PGConnection.class);
                int k = 0;
                while (sending.get()) {
                    if (busy) {
                        transaction(conn, app, k++ % 100 + 1);
                    }
                    PGNotification[] ns = pg.getNotifications(50);
                    if (ns != null) {
                        for (PGNotification n : ns) {
                            got.add(new String[] {n.getName(), n.getParameter()});
                        }
                    }
                }
            } catch (Exception e) {
                failures.add(own + ": " + e);
            }
        }

        void verify(List<String> tags, int count) {
            Map<String, Integer> next = new HashMap<>();
            tags.forEach(t -> next.put(t, 0));
            int directs = 0;
            for (String[] n : new ArrayList<>(got)) {
                String channel = n[0];
                String payload = n[1];
                if (channel.equals(own)) {
                    if (!payload.equals(direct) && !ISOLATED) {
                        continue;
                    }
                    check(payload.equals(direct), own + ": unexpected " + payload);
                    directs++;
                    continue;
                }
                check(channel.equals(SHARED), own + ": a notification on " + channel);
                int cut = payload.lastIndexOf(':');
                String tag = payload.substring(0, cut);
                int seq = Integer.parseInt(payload.substring(cut + 1));
                if (!next.containsKey(tag) && !ISOLATED) {
                    continue;
                }
                check(next.containsKey(tag), own + ": " + payload + " is not from its app");
                check(seq == next.get(tag), own + ": " + payload + " out of order or repeated (expected "
                        + tag + ":" + next.get(tag) + ")");
                next.put(tag, seq + 1);
            }
            for (Map.Entry<String, Integer> e : next.entrySet()) {
                check(e.getValue() == count, own + ": " + e.getValue() + " of " + count + " from " + e.getKey());
            }
            check(directs == 1, own + ": " + directs + " direct notifications");
        }
    }

    static void send(App app, String tag, int count, List<String[]> directs) throws Exception {
        try (Connection c = connect(app);
                PreparedStatement ps = c.prepareStatement("SELECT pg_notify(?, ?)")) {
            for (int seq = 0; seq < count; seq++) {
                ps.setString(1, SHARED);
                ps.setString(2, tag + ":" + seq);
                ps.execute();
            }
            for (String[] d : directs) {
                ps.setString(1, d[0]);
                ps.setString(2, d[1]);
                ps.execute();
            }
        }
    }

    static void guarded(String what, ThrowingRunnable r) {
        try {
            r.run();
        } catch (Exception e) {
            failures.add(what + ": " + e);
        }
    }

    static Thread thread(String what, ThrowingRunnable r) {
        Thread t = new Thread(() -> {
            try {
                r.run();
            } catch (Exception e) {
                failures.add(what + ": " + e);
            }
        });
        t.start();
        return t;
    }

    interface ThrowingRunnable {
        void run() throws Exception;
    }

    public static void main(String[] args) throws Exception {
        url = "jdbc:postgresql://" + env("DP_HOST") + ":" + env("DP_PORT") + "/" + env("DP_DBNAME");
        App one = new App(env("DP_APP1_USER"), env("DP_APP1_PASSWORD"));
        App two = new App(env("DP_APP2_USER"), env("DP_APP2_PASSWORD"));
        int listeners = envInt("DP_LISTENERS", 50);
        int workers = envInt("DP_WORKERS", 8);
        int senders = envInt("DP_SENDERS", 2);
        int count = envInt("DP_NOTIFICATIONS", 100);
        int others = envInt("DP_OTHER_LISTENERS", 3);

        List<Listener> mine = new ArrayList<>();
        for (int i = 0; i < listeners; i++) {
            mine.add(new Listener(one, "matrix_c" + i, "direct:matrix_c" + i, i < 10));
        }
        List<Listener> theirs = new ArrayList<>();
        for (int i = 0; i < others; i++) {
            theirs.add(new Listener(two, "matrix_c" + i, "app2-direct:matrix_c" + i, false));
        }
        // A few logins at a time: a cold JVM's SCRAM (PBKDF2) for 53 connections at
        // once can outlast the login timeout on a busy machine, and logins are not what
        // this tests.
        java.util.concurrent.ExecutorService opener = java.util.concurrent.Executors.newFixedThreadPool(8);
        for (Listener l : mine) {
            opener.submit(() -> guarded("open " + l.own, l::open));
        }
        for (Listener l : theirs) {
            opener.submit(() -> guarded("open app 2 " + l.own, l::open));
        }
        opener.shutdown();
        check(opener.awaitTermination(DEADLINE_MS, java.util.concurrent.TimeUnit.MILLISECONDS),
                "the listeners did not open in time");
        check(failures.isEmpty(), "opening the listeners: " + failures);

        List<Thread> background = new ArrayList<>();
        for (Listener l : mine) {
            background.add(thread("pump " + l.own, l::pump));
        }
        for (Listener l : theirs) {
            background.add(thread("pump app 2 " + l.own, l::pump));
        }
        for (int w = 0; w < workers; w++) {
            background.add(thread("worker " + w, () -> {
                try (Connection c = connect(one)) {
                    int k = 0;
                    while (sending.get()) {
                        transaction(c, one, k++ % 100 + 1);
                    }
                }
            }));
        }
        List<String> tags = new ArrayList<>();
        List<Thread> sends = new ArrayList<>();
        for (int s = 0; s < senders; s++) {
            String tag = "app1-" + s;
            tags.add(tag);
            List<String[]> directs = new ArrayList<>();
            for (int i = s; i < listeners; i += senders) {
                directs.add(new String[] {mine.get(i).own, mine.get(i).direct});
            }
            sends.add(thread("sender " + tag, () -> send(one, tag, count, directs)));
        }
        List<String[]> theirDirects = new ArrayList<>();
        for (Listener l : theirs) {
            theirDirects.add(new String[] {l.own, l.direct});
        }
        sends.add(thread("app 2 sender", () -> send(two, "app2-0", count, theirDirects)));
        for (Thread t : sends) {
            t.join();
        }
        long started = System.currentTimeMillis();
        while (System.currentTimeMillis() - started < DEADLINE_MS) {
            boolean enough = mine.stream().allMatch(l -> l.got.size() >= senders * count + 1)
                    && theirs.stream().allMatch(l -> l.got.size() >= count + 1);
            if (enough && (ISOLATED || System.currentTimeMillis() - started > 2000)) {
                break;
            }
            Thread.sleep(50);
        }
        // A duplicate would arrive right behind the last one.
        Thread.sleep(500);
        sending.set(false);
        for (Thread t : background) {
            t.join();
        }
        for (Listener l : mine) {
            try {
                l.verify(tags, count);
            } catch (IllegalStateException e) {
                failures.add("app 1 " + e.getMessage());
            }
        }
        for (Listener l : theirs) {
            try {
                l.verify(List.of("app2-0"), count);
            } catch (IllegalStateException e) {
                failures.add("app 2 " + e.getMessage());
            }
        }
        long delivered = 0;
        for (Listener l : mine) {
            delivered += l.got.size();
            l.conn.close();
        }
        for (Listener l : theirs) {
            delivered += l.got.size();
            l.conn.close();
        }
        String label = "PgJDBC " + org.postgresql.util.DriverInfo.DRIVER_VERSION + " LISTEN";
        if (!failures.isEmpty()) {
            System.err.println(label + ": " + failures.size() + " failures:");
            failures.stream().limit(20).forEach(f -> System.err.println("  " + f));
            System.exit(1);
        }
        System.out.println(label + ": ok, " + (listeners + others) + " listeners of 2 roles, " + delivered
                + " notifications, " + transactions.get() + " transactions meanwhile");
    }
}
